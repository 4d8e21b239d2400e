"""The local VM (vagrant/), checked without booting it."""
