"""Tools on top of the core: sharded, resumable sampling of large sets (``sharded``;
``gradguide sample``), the command line's output rules (``outputs``: never into the package,
never over a file without ``--force``) and optional-dependency messages (``extras``). The
command line is :mod:`gradguide.cli`; the benchmark and verification harness is
:mod:`gradguide.bench`."""
