"""imgest's thin shared runtime: no business logic, only the plumbing every service shares."""
