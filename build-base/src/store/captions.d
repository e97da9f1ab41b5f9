build-base/src/store/captions.o: src/store/captions.c \
 src/store/captions.h src/core/core.h include/clipdb.h
src/store/captions.h:
src/core/core.h:
include/clipdb.h:
