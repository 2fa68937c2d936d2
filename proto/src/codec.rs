//! The server's gRPC codec: prost's, with small per-stream buffers.
//!
//! tonic allocates an 8 KiB encode buffer and an 8 KiB decode buffer for every
//! stream, and gathers encoded messages until 32 KiB before handing them to HTTP/2,
//! so a stream that once sent a few chunks back to back keeps a buffer of that
//! size. With one stream per agent and 10,000 agents that is hundreds of MiB held
//! by streams that carry acknowledgements up and a few hundred bytes per change
//! down. Here buffers start at 1 KiB (they grow when a message needs it) and each
//! encoded message goes to HTTP/2 on its own (it is a chunk of at most
//! `--chunk-bytes` already).

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::ProstCodec;

/// Initial size of a stream's encode and decode buffers.
const BUFFER_BYTES: usize = 1024;
/// Encoded bytes gathered before they are handed to HTTP/2: every message at once.
const YIELD_BYTES: usize = 1;

/// Prost encoding with [`BUFFER_BYTES`] buffers; the generated server uses it.
#[derive(Debug, Clone)]
pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER_BYTES, YIELD_BYTES))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER_BYTES, YIELD_BYTES))
    }
}
