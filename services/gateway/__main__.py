"""Order gateway: gRPC on 50051, opens and closes positions, publishes orders.events."""

from services.gateway.main import main

main()
