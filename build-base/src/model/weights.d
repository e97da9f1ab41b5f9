build-base/src/model/weights.o: src/model/weights.c src/model/model.h \
 src/core/core.h include/clipdb.h src/model/safetensors.h \
 src/model/tokenizer.h
src/model/model.h:
src/core/core.h:
include/clipdb.h:
src/model/safetensors.h:
src/model/tokenizer.h:
