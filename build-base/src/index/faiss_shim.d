build-base/src/index/faiss_shim.o: src/index/faiss_shim.cc \
 src/index/index.h include/clipdb.h src/core/core.h
src/index/index.h:
include/clipdb.h:
src/core/core.h:
