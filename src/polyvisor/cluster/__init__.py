"""Operations across hypervisor connections: moving a VM from one to another, live or cold.

>>> from polyvisor.cluster import migrate
>>> report = migrate("web", "qemu:///session?root=/srv/a", "qemu:///session?root=/srv/b",
...                  MigrationOptions(live=True))                                          # doctest: +SKIP
"""

from polyvisor.cluster.migration import migrate, migrate_between

__all__ = ["migrate", "migrate_between"]
