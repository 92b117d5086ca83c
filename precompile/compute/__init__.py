"""The table math and the device it runs on."""
