"""ocibuild's build domain: castore, OCI, and the stages of a build."""
