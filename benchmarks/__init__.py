"""The benchmark suites (see README.md). Importable as a package so tests reach suite code as modules
(``from benchmarks import glue_minilm``); each suite still runs as ``python benchmarks/<suite>.py``."""
