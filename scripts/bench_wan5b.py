"""``python scripts/bench_wan5b.py [options]``: the WAN 2.2 TI2V-5B benchmark, whose parts live in the package
``scripts/bench_wan5b/`` beside this file (its docstring lists them; a package wins over a module of the same name
on import)."""

from bench_wan5b.__main__ import main

if __name__ == "__main__":
    main()
