"""usersvc: user accounts for a fleet of backend services, over gRPC."""

__version__ = "0.1.0"
