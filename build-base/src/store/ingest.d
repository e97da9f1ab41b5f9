build-base/src/store/ingest.o: src/store/ingest.c src/store/captions.h \
 src/core/core.h include/clipdb.h src/store/store.h
src/store/captions.h:
src/core/core.h:
include/clipdb.h:
src/store/store.h:
