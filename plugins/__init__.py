"""The built-in plugins. Each is an ordinary pluggy plugin, written only against the
hooks in ``host.hookspecs``, and doubles as a reference for plugin authors."""
