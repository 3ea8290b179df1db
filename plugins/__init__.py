"""mmsec's built-in plugins (installed as ``mmsec_plugins``), each registered by an entry point."""
