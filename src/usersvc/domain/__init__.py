"""Entities, value objects and errors; imports neither grpc nor sqlalchemy."""
