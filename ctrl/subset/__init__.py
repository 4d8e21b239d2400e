"""EndpointSlice subsetting by zone (docs/subsetting.md): which endpoints
each zone's nodes may use, packed into subset slices (compute, pure), and
the `sliceproxy subsetter` controller that writes them (controller)."""
