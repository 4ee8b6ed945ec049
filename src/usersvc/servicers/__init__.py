"""gRPC servicers: proto <-> domain mapping, nothing else."""
