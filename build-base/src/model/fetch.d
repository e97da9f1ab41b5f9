build-base/src/model/fetch.o: src/model/fetch.c src/core/core.h \
 include/clipdb.h src/model/safetensors.h
src/core/core.h:
include/clipdb.h:
src/model/safetensors.h:
