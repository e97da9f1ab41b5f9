build-base/src/model/model.o: src/model/model.c src/model/model.h \
 src/core/core.h include/clipdb.h src/model/safetensors.h \
 src/model/tokenizer.h
src/model/model.h:
src/core/core.h:
include/clipdb.h:
src/model/safetensors.h:
src/model/tokenizer.h:
