"""cgroup v2 and v1 freezer support: a cgroup of one's own, and discovery (issue 4)."""
