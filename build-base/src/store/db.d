build-base/src/store/db.o: src/store/db.c src/store/store.h \
 src/core/core.h include/clipdb.h
src/store/store.h:
src/core/core.h:
include/clipdb.h:
