from benchmarks.gpu_check import main

main()
