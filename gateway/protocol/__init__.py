"""The JSON protocol of the contract: frames, their parsing and encoding; valid channel names."""
