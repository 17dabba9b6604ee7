fn main() {
    let mut ebpf = aya::Ebpf::load(ferry_agent::loader::DATAPLANE_OBJ).unwrap();
    let prog: &mut aya::programs::SchedClassifier = ebpf.program_mut("from_pod").unwrap().try_into().unwrap();
    prog.load().unwrap();
    println!("loaded");
}
