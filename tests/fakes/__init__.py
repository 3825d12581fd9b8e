"""Stand-ins for libraries that users' code calls (jmp), for tests."""
