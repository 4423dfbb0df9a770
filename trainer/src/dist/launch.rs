//! Whether an MPI launcher started this process, from the variables launchers set: Open MPI's
//! `mpirun` (`OMPI_COMM_WORLD_SIZE`), MPICH / Intel MPI's Hydra (`PMI_SIZE`), PMIx launchers
//! (`PMIX_RANK`, with the size from another variable when there is one) and Slurm's `srun`
//! (`SLURM_STEP_NUM_TASKS`). Only a launch of more than one process counts: `mpirun -n 1` and
//! a plain `srun` of one task are single-process runs.

/// The launcher that started this process, and how many processes it started.
#[derive(Clone, Debug, PartialEq)]
pub struct Launcher {
    pub name: &'static str,
    pub processes: usize,
}

/// The variables, in the order they are asked (the first with more than one process wins).
const SIZE_VARS: &[(&str, &str)] = &[
    ("OMPI_COMM_WORLD_SIZE", "mpirun (Open MPI)"),
    ("PMI_SIZE", "an MPI launcher (PMI)"),
    ("SLURM_STEP_NUM_TASKS", "srun (Slurm)"),
];

/// The launcher of this process, if one started more than one.
pub fn detect() -> Option<Launcher> {
    detect_in(|k| std::env::var(k).ok())
}

/// [`detect`] over any variable lookup (tests).
pub fn detect_in(var: impl Fn(&str) -> Option<String>) -> Option<Launcher> {
    for (key, name) in SIZE_VARS {
        if let Some(n) = var(key).and_then(|v| v.trim().parse::<usize>().ok())
            && n > 1
        {
            return Some(Launcher { name, processes: n });
        }
    }
    // A PMIx launch that sets no size: a rank other than 0 means there are several.
    match var("PMIX_RANK").and_then(|v| v.trim().parse::<usize>().ok()) {
        Some(r) if r > 0 => Some(Launcher { name: "a PMIx launcher", processes: r + 1 }),
        _ => None,
    }
}

/// Processes this launcher put on this machine, from its variables (before MPI is up: the
/// rayon pool is sized before anything else runs). `None` when no launcher says.
pub fn local_processes() -> Option<usize> {
    ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"]
        .iter()
        .find_map(|k| std::env::var(k).ok().and_then(|v| v.trim().parse::<usize>().ok()))
        .filter(|&n| n > 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| pairs.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn launchers_of_several_processes_are_detected() {
        assert_eq!(detect_in(env(&[])), None);
        assert_eq!(detect_in(env(&[("OMPI_COMM_WORLD_SIZE", "1")])), None);
        assert_eq!(detect_in(env(&[("SLURM_STEP_NUM_TASKS", "1"), ("PMIX_RANK", "0")])), None);
        let l = detect_in(env(&[("OMPI_COMM_WORLD_SIZE", "4")])).unwrap();
        assert_eq!((l.name, l.processes), ("mpirun (Open MPI)", 4));
        assert_eq!(detect_in(env(&[("PMI_SIZE", "2")])).unwrap().processes, 2);
        assert_eq!(detect_in(env(&[("SLURM_STEP_NUM_TASKS", "8")])).unwrap().name, "srun (Slurm)");
        assert!(detect_in(env(&[("PMIX_RANK", "3")])).is_some());
        assert_eq!(detect_in(env(&[("OMPI_COMM_WORLD_SIZE", "x")])), None);
    }
}
