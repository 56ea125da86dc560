"""Writers of flushed windows. A sink never touches the model or the device."""
