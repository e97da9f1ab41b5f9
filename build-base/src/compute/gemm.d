build-base/src/compute/gemm.o: src/compute/gemm.c src/compute/compute.h
src/compute/compute.h:
