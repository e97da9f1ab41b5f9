build-base/src/model/tokenizer.o: src/model/tokenizer.c src/model/model.h \
 src/core/core.h include/clipdb.h src/model/safetensors.h \
 src/model/tokenizer.h src/model/html_entities.inc
src/model/model.h:
src/core/core.h:
include/clipdb.h:
src/model/safetensors.h:
src/model/tokenizer.h:
src/model/html_entities.inc:
