"""Stand-in for Forge's modules_forge package (its presence is how the extension tells Forge from A1111)."""
