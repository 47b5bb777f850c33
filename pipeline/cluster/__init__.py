"""Cluster launches: job submission (`cafe submit`, `cafe jobs`) and KubeRay manifests (`cafe deploy render`)."""
