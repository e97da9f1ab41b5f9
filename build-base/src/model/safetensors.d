build-base/src/model/safetensors.o: src/model/safetensors.c \
 src/model/safetensors.h src/core/core.h include/clipdb.h
src/model/safetensors.h:
src/core/core.h:
include/clipdb.h:
