"""worldhost's own tests. The ``worldhost`` fixture comes from host.testing, which
pytest loads through the ``pytest11`` entry point, as it would for a plugin author;
``serverproc`` and ``worlds`` are helpers shared with bench/."""
