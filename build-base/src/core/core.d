build-base/src/core/core.o: src/core/core.c src/core/core.h \
 include/clipdb.h
src/core/core.h:
include/clipdb.h:
