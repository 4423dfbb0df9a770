//! Data parallel under `mpirun` (feature `mpi`): 2 ranks as 2 processes on the CPU backend.
//!
//! Skipped when `mpirun` is missing, unless `CAE_REQUIRE_MPI=1` (CI), where that fails. The
//! tests run one at a time (each starts two trainers on a 2-core machine).

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use burn::backend::Flex;
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use cae_trainer::train::{HANG_ENV, STEP_LOG, StepLog, read_step_log};
use common::{BIN, text};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// What every test starts with: the lock that runs them one at a time and a temporary folder;
/// `None` when mpirun is missing (skipped).
fn setup() -> Option<(std::sync::MutexGuard<'static, ()>, tempfile::TempDir)> {
    let one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    have_mpirun().then(|| (one, tempfile::tempdir().unwrap()))
}

/// The uninterrupted 2-rank run of `args` into `out` (the reference an interrupted one must
/// continue exactly).
fn reference(args: &[String]) {
    let o = finish(mpirun(args, &[]));
    assert!(o.status.success(), "{}", text(&o));
}

/// Whether `mpirun` is here (else the test is skipped, or fails under `CAE_REQUIRE_MPI=1`).
fn have_mpirun() -> bool {
    let found = Command::new("mpirun").arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(std::env::var("CAE_REQUIRE_MPI").as_deref() != Ok("1"), "CAE_REQUIRE_MPI=1 but mpirun is missing");
        eprintln!("skipped: mpirun not found (apt-get install openmpi-bin libopenmpi-dev)");
    }
    found
}

/// 8 images in 2 shards of 4 (a manifest): with 4 images per rank, each rank reads one shard
/// per epoch, so 2 ranks see in one step exactly the 8 images 1 process sees in its batch of 8.
fn eight_images(dir: &Path) -> PathBuf {
    common::shards_of(dir, 2, 4, 4)
}

/// `trainer run` arguments: micro, pixels, one worker, `steps` steps, batch `batch` per process,
/// `accumulation` in the recipe (the total batch is `batch x accumulation`), then `extra`.
fn run_args(shards: &Path, out: &Path, steps: u64, batch: usize, accumulation: usize, extra: &[&str]) -> Vec<String> {
    let (batch, accumulation) =
        (format!("data.batch_size={batch}"), format!("optimizer.accumulation_steps={accumulation}"));
    let mut more =
        vec!["--set", &batch, "--set", &accumulation, "--set", "data.shuffle_buffer=4", "--set", "log_every=1"];
    more.extend(extra);
    common::args(&shards.to_string_lossy(), out, steps, &more)
}

/// `mpirun -n 2` of the trainer with `args`, each line tagged with its rank, one compute
/// thread per rank (2 ranks on 2 cores), `envs` passed to every rank.
fn mpirun(args: &[String], envs: &[(&str, &str)]) -> Child {
    let mut c = Command::new("mpirun");
    c.args(["--allow-run-as-root", "--oversubscribe", "--tag-output", "-n", "2"]);
    c.env("RAYON_NUM_THREADS", "1").env_remove(HANG_ENV);
    c.args(["-x", "RAYON_NUM_THREADS"]);
    for (k, v) in envs {
        c.env(k, v).args(["-x", k]);
    }
    c.arg(BIN).args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    c.spawn().expect("spawn mpirun")
}

fn finish(child: Child) -> Output {
    child.wait_with_output().unwrap()
}

/// Waits (up to `limit`) until a line of the child's stderr or stdout contains `needle`;
/// returns everything read so far. Both pipes are drained by threads into one buffer.
struct Watched {
    child: Child,
    seen: std::sync::Arc<Mutex<String>>,
}

impl Watched {
    fn new(mut child: Child) -> Self {
        let seen = std::sync::Arc::new(Mutex::new(String::new()));
        let pipes: Vec<Box<dyn Read + Send>> = vec![
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ];
        for pipe in pipes {
            let seen = std::sync::Arc::clone(&seen);
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    seen.lock().unwrap().push_str(&format!("{line}\n"));
                }
            });
        }
        Self { child, seen }
    }

    fn wait_for(&self, needle: &str, limit: Duration) -> String {
        let t = Instant::now();
        loop {
            let s = self.seen.lock().unwrap().clone();
            if s.contains(needle) {
                return s;
            }
            assert!(t.elapsed() < limit, "no {needle:?} within {limit:?}:\n{s}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the exit (up to `limit`): the status and everything printed.
    fn exit(mut self, limit: Duration) -> (std::process::ExitStatus, String, Duration) {
        let t = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(200)); // the pipe threads drain
                return (status, self.seen.lock().unwrap().clone(), t.elapsed());
            }
            if t.elapsed() > limit {
                let _ = self.child.kill();
                panic!("the job did not end within {limit:?}:\n{}", self.seen.lock().unwrap());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The pid of rank `rank` of the job writing into `out` (found by its command line and the
/// rank Open MPI puts in its environment).
fn rank_pid(out: &Path, rank: usize) -> i32 {
    let want_arg = out.to_string_lossy().into_owned();
    let want_env = format!("OMPI_COMM_WORLD_RANK={rank}");
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        let is_trainer = args.first().is_some_and(|a| a.ends_with(b"trainer"));
        if !is_trainer || !args.contains(&want_arg.as_bytes()) {
            continue;
        }
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        if env.split(|&b| b == 0).any(|v| v == want_env.as_bytes()) {
            return pid;
        }
    }
    panic!("no rank {rank} writing into {}", out.display())
}

fn signal(pid: i32, sig: &str) {
    assert!(Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success());
}

/// Every float parameter of the model in `ckpt`, flattened.
fn weights(ckpt: &Path) -> Vec<f32> {
    struct V(Vec<f32>);
    impl<B: Backend> ModuleVisitor<B> for V {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            self.0.extend(p.val().into_data().convert::<f32>().to_vec::<f32>().unwrap());
        }
    }
    let (model, _, _) = cae_trainer::weights::load_model::<Flex>(ckpt, &Default::default()).unwrap();
    let mut v = V(Vec::new());
    model.visit(&mut v);
    v.0
}

fn latest(out: &Path) -> PathBuf {
    cae_trainer::checkpoint::locate(out).unwrap()
}

/// Lines of rank `rank` in `mpirun --tag-output` text (`[1,0]<stdout>:...`).
fn rank_lines(all: &str, rank: usize) -> Vec<String> {
    let tag = format!("[1,{rank}]<");
    all.lines().filter(|l| l.contains(&tag)).map(String::from).collect()
}

fn digest_of(all: &str, rank: usize) -> String {
    let line = rank_lines(all, rank).into_iter().find(|l| l.contains("weights digest")).unwrap_or_else(|| {
        panic!("rank {rank} printed no weights digest:\n{all}");
    });
    line.split("weights digest ").nth(1).unwrap().split_whitespace().next().unwrap().to_string()
}

fn losses(out: &Path) -> Vec<(u64, f64)> {
    read_step_log(&out.join(STEP_LOG)).unwrap().iter().map(|l: &StepLog| (l.step, l.loss)).collect()
}

#[test]
fn two_ranks_agree_bit_for_bit_and_equal_one_process_with_the_whole_batch() {
    let Some((_one, tmp)) = setup() else { return };
    let shards = eight_images(tmp.path());
    let (solo, pair) = (tmp.path().join("solo"), tmp.path().join("pair"));
    let o = common::run(&run_args(&shards, &solo, 3, 8, 1, &[]));
    assert!(o.status.success(), "{}", text(&o));
    let o = finish(mpirun(&run_args(&shards, &pair, 3, 4, 2, &[]), &[]));
    let all = text(&o);
    assert!(o.status.success(), "{all}");
    assert!(all.contains("2 processes x 4 images x 1 micro-batch(es) = 8 images per step"), "{all}");
    assert_eq!(digest_of(&all, 0), digest_of(&all, 1), "the ranks' weights differ:\n{all}");
    let (a, b) = (weights(&latest(&solo)), weights(&latest(&pair)));
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let diff: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
    let rel = norm(&diff) / norm(&a);
    assert!(rel <= 1e-5, "|dw|/|w| = {rel:e} after 3 steps");
    // The steps moved the weights (the comparison is not of two untouched inits).
    let ck = cae_trainer::checkpoint::Checkpoint::read_header(&latest(&pair)).unwrap();
    assert_eq!((ck.step, ck.world_size, ck.rank_loaders.len()), (3, 2, 2));
    let (l1, l2) = (losses(&solo), losses(&pair));
    for ((s1, x), (s2, y)) in l1.iter().zip(&l2) {
        assert_eq!(s1, s2);
        assert!((x - y).abs() <= 1e-4 * x.abs(), "step {s1}: loss {x} alone, {y} in the group");
    }
}

#[test]
fn a_killed_rank_ends_the_job_and_the_group_resumes_where_it_was() {
    let Some((_one, tmp)) = setup() else { return };
    let shards = common::shards(tmp.path());
    let (whole, cut) = (tmp.path().join("whole"), tmp.path().join("cut"));
    let args = |out: &Path| run_args(&shards, out, 20, 2, 2, &["--checkpoint-every", "2", "--resume", "auto"]);
    reference(&args(&whole));
    let job = Watched::new(mpirun(&args(&cut), &[]));
    job.wait_for("step      4/", Duration::from_secs(120));
    signal(rank_pid(&cut, 1), "-KILL");
    let (status, all, took) = job.exit(Duration::from_secs(60));
    assert!(!status.success(), "{all}");
    assert!(all.contains("rank 1") || all.contains("rank: 1"), "the launcher names the dead rank:\n{all}");
    assert!(took < Duration::from_secs(60));
    let o = finish(mpirun(&args(&cut), &[]));
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("resuming from"), "{}", text(&o));
    assert_eq!(losses(&cut), losses(&whole), "the resumed group continues as the uninterrupted one");
}

#[test]
fn sigterm_to_one_rank_stops_every_rank_with_one_checkpoint_and_the_same_command_continues() {
    let Some((_one, tmp)) = setup() else { return };
    let shards = common::shards(tmp.path());
    let (whole, cut) = (tmp.path().join("whole"), tmp.path().join("cut"));
    let args = |out: &Path| run_args(&shards, out, 20, 2, 2, &["--checkpoint-every", "0", "--resume", "auto"]);
    reference(&args(&whole));
    let job = Watched::new(mpirun(&args(&cut), &[]));
    job.wait_for("step      2/", Duration::from_secs(120));
    // The signal reaches rank 1 alone (Kubernetes may do that; Slurm signals every rank).
    signal(rank_pid(&cut, 1), "-TERM");
    let (status, all, _) = job.exit(Duration::from_secs(120));
    assert_eq!(status.code(), Some(143), "128 + SIGTERM:\n{all}");
    let checkpoints = cae_trainer::checkpoint::list(&cut.join("checkpoints")).unwrap();
    assert_eq!(checkpoints.len(), 1, "one checkpoint: {checkpoints:?}\n{all}");
    let at = checkpoints[0].0;
    assert!((2..20).contains(&at), "stopped at step {at}");
    for rank in [0, 1] {
        let lines = rank_lines(&all, rank);
        let said = format!("stopped by signal after step {at}");
        assert!(lines.iter().any(|l| l.contains(&said)), "rank {rank} stops after the same step:\n{all}");
        assert!(lines.iter().any(|l| l.contains("(interrupted)")), "rank {rank}:\n{all}");
    }
    assert_eq!(digest_of(&all, 0), digest_of(&all, 1));
    let o = finish(mpirun(&args(&cut), &[]));
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(losses(&cut), losses(&whole), "the same command continues exactly");
}

#[test]
fn a_stopped_rank_trips_the_watchdog() {
    let Some((_one, tmp)) = setup() else { return };
    let shards = common::shards(tmp.path());
    let out = tmp.path().join("run");
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut a = run_args(&shards, &out, 500, 2, 2, &["--dist-timeout", "3", "--metrics-addr", &addr]);
    let at = a.iter().position(|x| x == "off").unwrap(); // common::args' `--metrics-addr off`
    a.drain(at - 1..=at);
    let job = Watched::new(mpirun(&a, &[]));
    job.wait_for("step      2/", Duration::from_secs(120));
    // Every rank serves its own series on the port plus its local rank, labelled by rank.
    let rank1 = common::scrape(port + 1);
    assert!(rank1.contains("cae_train_allreduce_seconds") && rank1.contains("rank=\"1\""), "{rank1}");
    let stopped = rank_pid(&out, 1);
    signal(stopped, "-STOP");
    let (status, all, took) = job.exit(Duration::from_secs(60));
    let _ = Command::new("kill").args(["-KILL", &stopped.to_string()]).status();
    assert!(!status.success(), "{all}");
    assert!(all.contains("rank 0: no collective completed for"), "{all}");
    assert!(all.contains("waiting in the all-reduce"), "{all}");
    assert!(all.contains("rank 1 stopped answering"), "the hung rank is named:\n{all}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

#[test]
fn resuming_under_another_world_size_is_refused() {
    let Some((_one, tmp)) = setup() else { return };
    let shards = common::shards(tmp.path());
    let out = tmp.path().join("run");
    let o = finish(mpirun(&run_args(&shards, &out, 2, 2, 2, &[]), &[]));
    assert!(o.status.success(), "{}", text(&o));
    let o = common::run(&run_args(&shards, &out, 4, 2, 2, &["--resume"]));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("a group of 2 process(es); this launch has 1"), "{t}");
}
