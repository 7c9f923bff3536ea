//! Load generation (vmcload): placeholder until it lands.
