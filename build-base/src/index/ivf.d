build-base/src/index/ivf.o: src/index/ivf.c src/index/index.h \
 include/clipdb.h src/core/core.h
src/index/index.h:
include/clipdb.h:
src/core/core.h:
