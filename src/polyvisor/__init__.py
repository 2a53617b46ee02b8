"""polyvisor: make virtual machines portable between hypervisors."""

__version__ = "0.1.0"
