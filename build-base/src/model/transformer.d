build-base/src/model/transformer.o: src/model/transformer.c \
 src/compute/compute.h src/model/tokenizer.h src/core/core.h \
 include/clipdb.h src/model/transformer.h src/model/model.h \
 src/model/safetensors.h
src/compute/compute.h:
src/model/tokenizer.h:
src/core/core.h:
include/clipdb.h:
src/model/transformer.h:
src/model/model.h:
src/model/safetensors.h:
