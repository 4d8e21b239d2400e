"""What every layer may use: the cyclic collector's pauses, logging, and
the 16-byte address form shared by the objects and the maps."""
