"""Ways in: the gRPC servicer that maps protobuf requests to commands."""
