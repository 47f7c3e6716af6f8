"""Studies built on the library, outside its core: experiments that use polar's kernels and APIs the way a user
would, each in its own package (``polar.studies.canonical``: the canonical low-rank problem, ``polar canonical``)."""
