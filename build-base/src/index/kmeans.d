build-base/src/index/kmeans.o: src/index/kmeans.c src/index/index.h \
 include/clipdb.h src/core/core.h src/compute/compute.h
src/index/index.h:
include/clipdb.h:
src/core/core.h:
src/compute/compute.h:
