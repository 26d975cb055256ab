fn main() {
    let bytes = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/blkmirror-ebpf"));
    println!("{}", bytes.len());
}
