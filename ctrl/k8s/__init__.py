"""Kubernetes objects and where they come from: the records and their
parsing (objects, slicejson), the two sources (files: a directory of YAML;
kube: the API server's list and watch) and the Event they queue."""
