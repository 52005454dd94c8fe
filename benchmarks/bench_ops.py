"""Runnable entry of the kernel benchmarks (the code lives in fgd.bench so it ships with the
package). Usage: python benchmarks/bench_ops.py [--quick] [--no-compile] [--device cuda]"""
from fgd.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
