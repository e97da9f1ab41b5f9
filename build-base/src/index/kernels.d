build-base/src/index/kernels.o: src/index/kernels.c src/index/index.h \
 include/clipdb.h src/core/core.h src/compute/compute.h
src/index/index.h:
include/clipdb.h:
src/core/core.h:
src/compute/compute.h:
