build-base/src/model/image.o: src/model/image.c src/model/image.h \
 src/core/core.h include/clipdb.h /usr/include/stb/stb_image.h \
 src/model/model.h src/model/safetensors.h src/model/tokenizer.h
src/model/image.h:
src/core/core.h:
include/clipdb.h:
/usr/include/stb/stb_image.h:
src/model/model.h:
src/model/safetensors.h:
src/model/tokenizer.h:
