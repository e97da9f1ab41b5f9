build-base/src/store/search.o: src/store/search.c src/index/index.h \
 include/clipdb.h src/core/core.h src/store/store.h
src/index/index.h:
include/clipdb.h:
src/core/core.h:
src/store/store.h:
