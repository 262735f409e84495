//! Generated code for Ember's gRPC APIs, compiled from `proto/` at build
//! time, and the codec it uses ([`codec`]). Nothing else hand-written lives
//! here: conversions to domain types belong to the crates that own those
//! types.
#![allow(missing_docs, unreachable_pub, clippy::all)]

pub mod codec;

/// `ember.control.v1`: the agent's control API.
pub mod control {
    pub mod v1 {
        tonic::include_proto!("ember.control.v1");
    }
}

/// `ember.repl.v1`: the agent-to-agent protocol.
pub mod repl {
    pub mod v1 {
        tonic::include_proto!("ember.repl.v1");
    }
}

/// Encoded `FileDescriptorSet` of every Ember proto, for reflection and tooling.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ember_descriptor");

#[cfg(test)]
mod tests {
    #[test]
    fn descriptor_set_decodes_and_names_the_control_service() {
        let set = <prost_types_shim::FileDescriptorSet as prost::Message>::decode(
            super::FILE_DESCRIPTOR_SET,
        )
        .expect("descriptor set decodes");
        assert!(set.file.iter().any(|f| f.package() == "ember.control.v1"));
        assert!(set.file.iter().any(|f| f.package() == "ember.repl.v1"));
    }

    mod prost_types_shim {
        pub use prost_types::FileDescriptorSet;
    }
}
