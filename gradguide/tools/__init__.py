"""Tools on top of the core: sharded, resumable sampling of large sets (``sharded``;
``gradguide sample``). The command line is :mod:`gradguide.cli`; the benchmark and
verification harness is :mod:`gradguide.bench`."""
