#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tarmac::fuzzing::tls_files(data));
