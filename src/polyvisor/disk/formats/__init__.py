"""One module per disk format; each registers itself with :func:`polyvisor.disk.registry.register_format`."""
